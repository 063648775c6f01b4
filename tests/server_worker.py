"""One rank of the torchrun server test in test_server.py: joins a gloo process group whose timeout
is PG_TIMEOUT_SECONDS (instead of 30 minutes), then runs ``python -m llama.server``'s main with the
remaining arguments. An idle server that outlives several such timeouts shows that the followers'
wait is kept alive by rank 0's heartbeats.

    torchrun --nproc_per_node 2 tests/server_worker.py --port 0 --heartbeat_seconds 0.5 ...
"""

import atexit
import datetime

import torch.distributed as dist

from llama.server.__main__ import main

PG_TIMEOUT_SECONDS = 3

if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_SECONDS))
    atexit.register(dist.destroy_process_group)  # an application's own group is its to destroy
    main()
