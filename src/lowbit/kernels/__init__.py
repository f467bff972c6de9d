"""Device kernels, optional and registered by what they accelerate; every one has an exact
eager fallback in `lowbit.formats`, and tests check they agree bit for bit."""
