"""SGLang integration of the DeFT decode path."""
