"""The ClientApp's side of :mod:`fedcore.core.packing`: packed arrays in, packed arrays out.

``fedcore client`` unpacks a message before any ClientApp sees it; this Flower
``Mod`` does the same inside fedcore's ClientApp, for a stock ``flower-supernode``
that runs it from the server's app bundle. A reply is packed when the message it
answers was (then the server is fedcore's, which unpacks it).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message

from fedcore.core.packing import pack_content, unpack_content

__all__ = ["packed_arrays_mod"]

Handler = Callable[[Message, Context], Message]


def packed_arrays_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Unpack ``msg``'s packed arrays for the handlers; pack the reply's if ``msg`` was packed.

    A malformed packed record raises :class:`~fedcore.core.packing.PackingError`
    (the ClientApp's error reply names it).
    """
    if not msg.has_content():
        return call_next(msg, context)
    content, packed = unpack_content(msg.content)
    if packed:
        msg.content = content
    reply = call_next(msg, context)
    if packed and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
