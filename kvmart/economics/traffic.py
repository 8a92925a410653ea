"""What a node moves out of the Redis shared tier, byte for byte: the replies to the commands kvmart's store and
catalogue send (kvmart/store/redis.py, kvmart/store/tiered.py, kvmart/reuse/catalog.py), in RESP3, the protocol
redis-py 8 speaks by default (RESP2, older redis-py's, differs only in a nil reply: 5 bytes instead of 3). Pure
functions, no I/O; the validation (kvmart/economics/validation.py) compares their sum with Redis' own output
counter. A new connection's handshake (a few hundred bytes, once per connection in a node's pool) is not counted.

    a chunk read from Redis     the planner's lookup of the chunk (GET of its index), then the Loader's read: its
                                index again (GET) and its bytes (MGET, FETCH_BATCH values at a time), kept on the
                                node's disk with the entry from that one index
    a document discovered       the catalogue's look at a changed document (GET of its index), then its index
                                artifact read whole (GET + MGET), kept on the node's disk
    a change-log poll           one script call: the generation alone when nothing changed, else it and the changes
                                ("<n>:<cache_id>" each)

    a document published       the publishing node's lookups (nil: the document, its first chunk's read, each
                                chunk before it is stored) and its writes (+OK for each value, 1 from the script
                                that publishes each index), about 50 bytes for a two-chunk document"""

from __future__ import annotations

from kvmart.store.redis import DEFAULT_CHUNK_BYTES, FETCH_BATCH


def bulk_bytes(length: int) -> int:
    """A bulk string reply of `length` bytes: `$<length>\\r\\n<bytes>\\r\\n`."""
    return length + len(str(length)) + 5


def integer_bytes(value: int) -> int:
    """`:<value>\\r\\n`."""
    return len(str(value)) + 3


def array_bytes(count: int) -> int:
    """An array reply's header, `*<count>\\r\\n` (its elements counted apart)."""
    return len(str(count)) + 3


def values_bytes(size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """The MGET replies carrying an artifact of `size` bytes, stored in values of `chunk_bytes`."""
    pieces = [min(chunk_bytes, size - start) for start in range(0, max(size, 1), chunk_bytes)]
    batches = [pieces[i:i + FETCH_BATCH] for i in range(0, len(pieces), FETCH_BATCH)]
    return sum(array_bytes(len(batch)) + sum(bulk_bytes(n) for n in batch) for batch in batches)


def fetch_bytes(index_json_bytes: int, size: int) -> int:
    """One artifact read with its entry (`_open_entry`): its index, then its values."""
    return bulk_bytes(index_json_bytes) + values_bytes(size)


def chunk_read_bytes(index_json_bytes: int, size: int) -> int:
    """A chunk a request reads from Redis: the planner's lookup, then the Loader's read."""
    return bulk_bytes(index_json_bytes) + fetch_bytes(index_json_bytes, size)


def discovery_bytes(index_json_bytes: int, size: int) -> int:
    """A document a node's catalogue learns of from the change log: its entry, then its index artifact."""
    return bulk_bytes(index_json_bytes) + fetch_bytes(index_json_bytes, size)


def change_bytes(number: int, cache_id: str) -> int:
    """One change as a poll returns it."""
    return bulk_bytes(len(f"{number}:{cache_id}"))


def poll_bytes(generation: int, changes: int = 0) -> int:
    """A change-log poll's reply, without its changes' own bytes (`change_bytes`)."""
    if not changes:
        return array_bytes(1) + integer_bytes(generation)
    return array_bytes(2) + integer_bytes(generation) + array_bytes(changes)


NIL_BYTES = len(b"_\r\n")  # RESP3's null
OK_BYTES = len(b"+OK\r\n")


def put_bytes(size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Storing one artifact: +OK for each value written, then the publishing script's 1."""
    return OK_BYTES * max(1, -(-size // chunk_bytes)) + integer_bytes(1)


def publish_bytes(chunk_sizes: list[int], index_size: int) -> int:
    """A document stored by the node that publishes it (kvmart/reuse/core.py's `precompute_ids`, none of its chunks
    stored before): the document looked up (nil), its first chunk looked for to read (nil), each chunk looked up
    before it is stored (nil) and stored, then its index stored."""
    chunks = sum(NIL_BYTES + put_bytes(size) for size in chunk_sizes)
    return NIL_BYTES + NIL_BYTES + chunks + put_bytes(index_size)
