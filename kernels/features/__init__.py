"""Prompt audio features at upload: kaldi fbank, log-mels, the two ONNX models, the extractor."""
