"""Model integrations (installed as ``pio_kernels.integrations``)."""
