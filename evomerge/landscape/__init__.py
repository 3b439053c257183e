"""Loss landscapes between models: interpolation paths and their barriers."""
