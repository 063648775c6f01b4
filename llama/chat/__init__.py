"""Dialogs as tokens: the chat formats (Llama 2's ``[INST]``, Llama 3's headers, a folder's own
template: ``format``) and tool calls in and out of them (``tool_calls``)."""
