from genvisor.client.client import Client

__all__ = ["Client"]
