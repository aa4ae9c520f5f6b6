"""Two-node runs on this machine: two `torchrun --nnodes 2` launches of one CPU process each on 127.0.0.1."""

import os
import socket
import subprocess
import sys


def launch_two_nodes(script_and_arguments: list[str], private_folder=None) -> list[tuple[int, str]]:
    """(exit code, stderr) of each node. With `private_folder`, each node runs in its own mount namespace with a
    private tmpfs on that folder (`unshare -m`, as root), as nodes whose disks the others cannot see."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    launches = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   *map(str, script_and_arguments)]
        if private_folder is not None:
            command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{private_folder}" && exec "$@"', "node",
                       *command]
        launches.append(subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    return [(launch.wait(timeout=300), launch.communicate()[1]) for launch in launches]
