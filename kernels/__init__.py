"""Pallas kernels for dsax, installed as ``dsax.kernels``.

Each op has a kernel file and a jnp reference with the same signature; kernels
import nothing from the rest of dsax.
"""
