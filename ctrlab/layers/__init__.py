"""Shared neural-network layers that interaction blocks are composed from."""
