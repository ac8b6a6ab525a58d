"""The pure SecAgg+ protocol: crypto, Shamir, quantization, graph, rosters, state machines.

No sockets, clock or global RNG; :mod:`fedcore.secagg.exchange` (server) and
:mod:`fedcore.secagg.handler` (client) drive it over Flower messages.
"""
