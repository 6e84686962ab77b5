"""Engine floor: requests, the step loop, the finish decision, detokenizing, the offline `LLM` API.
It holds no torch tensors: the executor samples on the device and hands back token ids.
May import: the executor floor and `inflight.batching` (the scheduler); never the serving floor."""
