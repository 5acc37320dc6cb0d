"""Bridges to other libraries, each imported on its own (``attnkit.integrations.transformers``)."""
