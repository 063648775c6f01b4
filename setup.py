from setuptools import find_packages, setup


def get_requirements(path: str):
    return [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Llama 2, Llama 2-Chat and Code Llama inference in native PyTorch",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.9",
    install_requires=get_requirements("requirements.txt"),
    extras_require={"test": ["pytest", "transformers>=5", "openai>=1", "protobuf", "jsonschema"]},  # openai: the server tests drive it with the official client; protobuf: transformers reads sentencepiece models with it; jsonschema: structured answers are validated with it
)
