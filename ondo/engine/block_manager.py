"""The KV cache as a pool of fixed-size blocks, with reference counts and prefix caching.

A full block is identified by a hash chained over every token before it (its parent block's hash
and its own tokens), so two requests share a block only when their whole prefix up to it is equal.
Freed blocks keep their hash and stay findable until the pool needs them again (least recently
freed first), so a later request with the same prefix skips recomputing it.

With `grow_lazily` (the CPU, whose KV memory is committed only when first written, see
`ModelRunner`), never-used blocks are handed out only when no freed block is left, so resident
memory follows the peak number of blocks in use instead of creeping up to the whole budget; the
price is that freed prefix blocks are reused (and forgotten) sooner.

With `contiguous` (the CPU too) a request's next block is the one right after its last block
whenever that one is free, ahead of the least recently freed: a sequence whose blocks follow each
other is one strided view of the cache, which the portable attention reads in place instead of
gathering its keys and values every layer (`torch_backend.py`). Taking that block early forgets
its cached prefix, if it holds one, before older ones.
"""
from __future__ import annotations

from collections import OrderedDict

from ondo.engine.request import Request


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


def chain_root(request: Request) -> int | None:
    """The parent hash of a request's first block: its LoRA adapter's identity, so KV computed
    through one adapter (or the base model) is never served to a request with another."""
    lora = request.lora_request
    return None if lora is None else hash(("lora", lora.lora_int_id, lora.lora_path))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 grow_lazily: bool = False, contiguous: bool = False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        # Blocks with no owner, oldest first; cached ones among them are evicted only when popped.
        # With grow_lazily, never-used blocks wait apart in `unused` (lowest id first).
        self.grow_lazily, self.contiguous = grow_lazily, contiguous
        self.unused: list[int] = list(range(num_blocks - 1, -1, -1)) if grow_lazily else []
        self.free_blocks: OrderedDict[int, None] = OrderedDict(
            (i, None) for i in ([] if grow_lazily else range(num_blocks)))
        self.prefix_queries = 0      # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0         # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.unused)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks holding the longest known prefix of a request that owns no blocks yet;
        returns the number of tokens they cover. The last prompt token is always left to compute,
        because its logits are needed to sample."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return 0
        tokens = request.token_ids(0, request.num_tokens)
        max_blocks = (len(tokens) - 1) // self.block_size
        parent, hits = chain_root(request), []
        for i in range(max_blocks):
            parent = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            hits.append((block, parent))
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(hits) * self.block_size
        for block, block_hash in hits:
            self._take(block)
            request.block_table.append(block)
            request.block_hashes.append(block_hash)
        return len(hits) * self.block_size

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Make the request's block table cover `num_tokens` tokens; False (nothing changed) if the pool is short."""
        needed = self.blocks_needed(num_tokens) - len(request.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self._next_after(request.block_table[-1]) if self.contiguous and request.block_table else None
            if block is None:
                block = self.free_blocks.popitem(last=False)[0] if self.free_blocks else self.unused.pop()
            self._evict(block)
            self.ref_counts[block] = 1
            request.block_table.append(block)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Hash the blocks that became full of computed tokens, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        # A token still in flight (async scheduling) has K/V but no id on the host yet: not hashable.
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        for i in range(len(request.block_hashes), num_full):
            parent = request.block_hashes[-1] if request.block_hashes else chain_root(request)
            block_hash = chain_hash(parent, request.token_ids(i * self.block_size, (i + 1) * self.block_size))
            request.block_hashes.append(block_hash)
            block = request.block_table[i]
            if block_hash not in self.cached:  # an identical block computed twice stays unshared
                self.cached[block_hash] = block
                self.block_hash[block] = block_hash

    def free(self, request: Request) -> None:
        # Release the tail first so the prefix, most likely to be shared, is evicted last.
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        request.block_table = []
        request.block_hashes = []

    def _next_after(self, last: int) -> int | None:
        """The block after `last`, taken out of the free ones if it is free; else None."""
        block = last + 1
        if block in self.free_blocks:
            del self.free_blocks[block]
            return block
        if self.unused and self.unused[-1] == block:   # never used: `unused` holds the highest ids
            return self.unused.pop()
        return None

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash[block]
        if block_hash is not None:
            if self.cached.get(block_hash) == block:
                del self.cached[block_hash]
            self.block_hash[block] = None
