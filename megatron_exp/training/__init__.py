"""The training loop and what it needs: optimizer and schedule, FLOPs and MFU, metric sinks."""
