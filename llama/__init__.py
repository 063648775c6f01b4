"""Llama 2, Llama 2-Chat and Code Llama inference in native PyTorch."""

from llama.generation import Dialog, Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Dialog", "Llama", "ModelArgs", "Tokenizer", "Transformer"]
