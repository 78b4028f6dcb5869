"""The lowest layer: small helpers that every other package (data, dataset, models, training, serve) and
the stage scripts use. It imports nothing of the project, so any layer may import it.

- files: atomic file writes and atomic folder replacement
- progress: a live elapsed-time line for work that reports no progress of its own
- memory: peak memory of this process (CPU resident set, or accelerator memory)
- randomness: stateless seeded hashes and permutations, identical on every machine
- processes: helper processes that exit when their parent dies; a guard for what a killed process leaves
"""

# Label value the loss skips (padding, prompt tokens, the last position after the shift): PyTorch's
# cross_entropy default and the Hugging Face convention, so batches mean the same thing to transformers.
IGNORE_INDEX = -100
