"""A Flower app that probes a node's executor (tests/test_executor.py).

The ServerApp sends `actions` (comma-separated) one after the other, each as a query to
the first node: `pid` answers the ClientApp's process id, `crash` ends that process with
exit code 3, `hang` sleeps for ten minutes. Each reply (a pid or an error's reason) goes
to `out-dir`/probe.json.
"""

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    """Do what the message's action says."""
    action = msg.content["probe"]["action"]
    if action == "crash":
        os._exit(3)
    if action == "hang":
        time.sleep(600)
    return Message(RecordDict({"probe": ConfigRecord({"pid": os.getpid()})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Send the actions to the first node; write every reply to `out-dir`/probe.json."""
    wanted = int(context.run_config["num-nodes"])
    while len(nodes := sorted(grid.get_node_ids())) < wanted:
        time.sleep(0.2)
    replies = []
    for action in str(context.run_config["actions"]).split(","):
        message = Message(RecordDict({"probe": ConfigRecord({"action": action})}),
                          dst_node_id=nodes[0], message_type="query")
        (reply,) = grid.send_and_receive([message], timeout=120)
        replies.append({"action": action,
                        "error": reply.error.reason if reply.has_error() else None,
                        "pid": None if reply.has_error() else reply.content["probe"]["pid"]})
    out = Path(str(context.run_config["out-dir"]), "probe.json")
    out.write_text(json.dumps(replies), encoding="utf-8")
