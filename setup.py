from setuptools import find_packages, setup


def get_requirements(path: str):
    return [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Llama 2, Llama 2-Chat, Code Llama and Llama 3, 3.1, 3.2 inference in native PyTorch",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.9",
    install_requires=get_requirements("requirements.txt"),
    extras_require={
        "finetune": ["matplotlib"],  # the loss curve's picture
        # python -m llama.evaluate; lm-eval's api extra: its backends that query a server (local-completions)
        "eval": ["lm_eval[api]>=0.4.13"],
        # openai: the server tests drive it with the official client; protobuf: transformers reads sentencepiece
        # models with it; peft: the reference for LoRA adapters; lm_eval[hf]: the evaluation tests compare with
        # lm-eval's own hf backend; jsonschema: structured answers are validated with it; fire: Meta's own example
        # scripts (tests/meta_style) read their flags with it; ruff: the suite runs its check with ruff.toml; trl: the
        # reference for DPO's loss; lm_eval[api]: its local-completions backend scores through the server
        "test": [
            "pytest",
            "transformers>=5",
            "openai>=1",
            "protobuf",
            "peft",
            "matplotlib",
            "lm_eval[hf,api]>=0.4.13",
            "jsonschema",
            "fire",
            "ruff",
            "trl>=1.16",
        ],
    },
)
