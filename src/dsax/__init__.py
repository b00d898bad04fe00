"""dsax: DeepSeek Sparse Attention research in JAX."""

__version__ = "0.1.0"
