"""Reference models (plain PyTorch) and their checkpoints.

- `llama`: a Llama decoder whose layers run on packed subsets of tokens; HF names, HF parity.
- `surprise`: the surprise gate g, the causal moving average, Top-K / threshold selection.
- `sdt`, `stt`: Subjective Depth (Decision + Dynamic layers) and Timescale (temporal layers).
- `delta_rule`, `gated_deltanet`, `hybrid`: the gated delta rule (recurrent and chunked forms),
  the Gated DeltaNet layer initialised from a softmax layer, and hybrid models of the two.
- `cache`: the compacted per-layer KV cache (kept entries only; linear layers: their recurrent
  state) for incremental decoding.
- `flops`: `count_flops`, the meter (executed vs dense FLOPs and KV entries per sequence).
- `convert`: dense → SDT/STT (base reference + `routing_adapter.safetensors`), `load_model`.
- `train`, `cli`: `subjective model convert ...` and `subjective train ...`.

Nothing is imported here, so `subjective --help` stays fast; import the submodules.
"""
