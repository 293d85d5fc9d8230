"""Pallas GPU kernels for vig-jax and the references that define them."""
