"""Weight averaging of models from one training run (SWA) or one base (soups)."""
