"""Types of the C extension decoder/_sha256pair.c."""

from _typeshed import ReadableBuffer, WriteableBuffer

USABLE: int

def compress(state: WriteableBuffer, blocks: ReadableBuffer, /) -> None: ...
def compress_pair(
    state_a: WriteableBuffer, blocks_a: ReadableBuffer,
    state_b: WriteableBuffer, blocks_b: ReadableBuffer, /,
) -> None: ...
