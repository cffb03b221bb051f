"""The engine: the causal Wan2.1 DiT and the pure functions that stream with it (torch only).

    config     frozen ModelConfig / StreamConfig
    model      CausalWanModel: one forward pass, attention through an `Attention` object
    state      State (with the memory bank as one `Bank` record), state_to
    context    which key frames a pass sees, and the per-chunk Workspace holding them
    memory     the Bank record (slots, pins, outside pictures), NAM refresh, SMA selection
    masks      attention masks over key frames: ablations, skipped empty slots
    schedule   the flow-matching step table
    noise      per-chunk noise from (seed, chunk)
    checks     input checks shared by the API and the CLI
    observers  observer values and their per-model, per-thread bindings
    steps      init_state, step, set_prompt, update_memory
"""
