"""Adapters for other libraries' conventions (``resflow_cuda.integrations.normflows``)."""
