"""What every stage uses and none owns: configuration and the command line (config), the terminal and
the third-party log (console), the output-folder lock (lock), models by folder or hub id (models),
local and object storage with atomic writes (storage), the vLLM engine's start-up (vllm_engine) and
token-budget batching (batching). Imports nothing of scorer/, train/ or pipelines/.
"""
