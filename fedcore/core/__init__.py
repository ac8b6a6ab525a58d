"""Shared pure core: config schema, errors, records, seeds, aggregation math, sampling.

Nothing here opens a socket, touches the disk, reads the clock or uses a global RNG;
both the server side and the client side build on it.
"""
