"""Analyses over a model: which format fits each layer (and, next, the quantization debugger)."""
