"""jaxtrain: a functional JAX training stack."""
