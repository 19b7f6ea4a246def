"""File and folder names inside a released CosyVoice2 model directory (torch-free, imports nothing).

The frontend (tokenizer, ONNX prompt models) and the kernels (config, checkpoint loading, the random
checkpoint maker) both name these files; they live here, at the bottom, so neither imports the other
for a string.
"""

YAML_NAME = "cosyvoice2.yaml"  # HyperPyYAML model config
QWEN_DIR = "CosyVoice-BlankEN"  # Qwen2 config.json + tokenizer vocab.json / merges.txt
LLM_FILE = "llm.pt"
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
WEIGHT_FILES = (LLM_FILE, FLOW_FILE, HIFT_FILE)  # the three torch state dicts, in load order
SPEECH_TOKENIZER_FILE = "speech_tokenizer_v2.onnx"
CAMPPLUS_FILE = "campplus.onnx"
