"""codegen-deploy: Salesforce CodeGen from a Hugging Face checkpoint to verified ONNX and TensorRT deployments."""

__version__ = "0.1.0"
