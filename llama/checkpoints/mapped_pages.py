"""Giving back the pages of a memory-mapped checkpoint tensor once it has been copied.

A checkpoint's tensors are memory-mapped: a page of the file becomes resident when it is first read,
and stays resident, counted in the process's memory, while the file is mapped, which is until the
last tensor of the file is freed. A tensor used as it is (same dtype, on the CPU) needs its pages; a
tensor that loading copies (the parts of a fused weight concatenated, a dtype converted, a weight
quantized or moved to a GPU) would keep them resident beside its copy, and loading would hold two
copies of the model. ``release_file_pages`` tells the kernel (``madvise(MADV_DONTNEED)``) that the
process no longer needs them: it drops them from the resident memory, and would read them from the
file again were they touched. Only pages of a private mapping of a file are released, never
anonymous memory (whose contents would be lost); elsewhere than Linux it does nothing.
"""

import ctypes
import ctypes.util
import mmap
import sys
from typing import Optional

import torch

MADV_DONTNEED = 4  # Linux's value on every architecture torch supports

_libc: Optional[ctypes.CDLL] = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


def mapped_file(begin: int, end: int) -> bool:
    """Whether bytes [begin, end) of this process lie in one private mapping of a file (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(address, 16) for address in fields[0].split("-"))
            if low <= begin < high:
                return (
                    end <= high
                    and fields[1].endswith("p")
                    and fields[4] != "0"
                    and len(fields) > 5
                    and fields[5].startswith("/")
                )
    return False


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop from the resident memory the whole pages of ``tensor``'s bytes when they are a mapped
    file's (a memory-mapped checkpoint tensor that has been copied); anything else is left alone."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    low, high = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages only
    if high > low and mapped_file(low, high):
        libc().madvise(low, high - low, MADV_DONTNEED)


def release_copied(source: torch.Tensor, copy: torch.Tensor) -> None:
    """``release_file_pages(source)`` when ``copy`` was made from it (does not share its memory)."""
    if copy.device != source.device or copy.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
        release_file_pages(source)
