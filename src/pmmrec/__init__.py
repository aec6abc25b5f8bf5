__version__ = "0.1.0"

__all__ = ["NewItem", "Recommender", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import pmmrec` (and the CLI's --help) never imports torch.
    if name in ("Recommender", "NewItem"):
        from pmmrec import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'pmmrec' has no attribute {name!r}")
