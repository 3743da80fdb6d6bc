"""peerpipe: run one large language model across the machines of a local network."""

__version__ = "0.1.0"
