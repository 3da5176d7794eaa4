"""lambdanet: LambdaNetworks (Bello, ICLR 2021) in JAX/Flax."""

__version__ = "0.1.0"
