"""Costs at a real size (issue 20 item 5): the client mod that times each message, the
ClientApp's outer mods, the server's fit CPU time in the round record, and
`scripts/bench/scale_costs.py`'s arithmetic and run."""

from __future__ import annotations

import json
import time

import cloudpickle
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import MessageTypeLegacy

from fl_app.app.client_app import make_client_app
from fl_app.client.node_policy import NodePolicyError
from fl_app.client.timing import JsonLinesSink, MessageSeconds, message_seconds_mod
from scripts.bench import scale_costs
from scripts.bench.scale_costs import Row, client_seconds, markdown, row_from


def context(node_config: dict | None = None, run_config: dict | None = None) -> Context:
    """A node's context, as Flower gives it to a ClientApp."""
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(),
                   run_config=run_config or {"model": "mlp", "dataset": "digits"})


def message(kind: str = MessageType.TRAIN, group: str = "3") -> Message:
    """A message from the server with group id `group`."""
    msg = Message(content=RecordDict(), dst_node_id=7, message_type=kind)
    msg.metadata.group_id = group
    return msg


def busy(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_mod_times_the_message_on_the_client_cpu_and_wall(identity):
    got: list[MessageSeconds] = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        busy(0.05)
        time.sleep(0.05)  # waiting costs wall time, no CPU
        return Message(RecordDict(), reply_to=msg)

    reply = message_seconds_mod(got.append)(message(group="3"), context(), call_next)
    assert reply.metadata.reply_to_message_id is not None
    [seconds] = got
    assert (seconds.node_id, seconds.message_type, seconds.group) == (7, MessageType.TRAIN, "3")
    # the sleep is not CPU time (process_time counts every thread: the bound leaves room)
    assert 0.05 <= seconds.cpu < seconds.wall - 0.03
    assert seconds.wall >= 0.1


def test_a_message_that_raises_is_not_counted(identity):
    got: list[MessageSeconds] = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        message_seconds_mod(got.append)(message(), context(), call_next)
    assert got == []


def test_outer_mods_come_before_the_apps_own(identity, tmp_path):
    """The node's policy refuses this run before anything is imported; an outer mod saw
    the message first."""
    seen: list[str] = []

    def outer(msg: Message, ctxt: Context, call_next) -> Message:
        seen.append(msg.metadata.message_type)
        return call_next(msg, ctxt)

    app = make_client_app(outer_mods=[outer])
    with pytest.raises(NodePolicyError, match="allow-models"):
        app(message(MessageTypeLegacy.GET_PROPERTIES),
            context({"allow-models": "logreg"}, {"model": "mlp", "dataset": "digits"}))
    assert seen == [MessageTypeLegacy.GET_PROPERTIES]


def test_the_json_lines_sink_travels_to_a_worker_and_reads_back(identity, tmp_path):
    sink = JsonLinesSink(str(tmp_path / "seconds.jsonl"))
    assert sink.read() == []
    mod = cloudpickle.loads(cloudpickle.dumps(message_seconds_mod(sink)))  # as Ray ships it
    for group in ("1", "2"):
        mod(message(group=group), context(), lambda msg, ctxt: Message(RecordDict(),
                                                                       reply_to=msg))
    sink(MessageSeconds(4, MessageType.EVALUATE, "2", 1.0, 0.5))
    got = sink.read()
    assert [(m.node_id, m.message_type, m.group) for m in got] == [
        (7, MessageType.TRAIN, "1"), (7, MessageType.TRAIN, "2"),
        (4, MessageType.EVALUATE, "2")]
    assert got[2] == MessageSeconds(4, MessageType.EVALUATE, "2", 1.0, 0.5)


def seconds(node: int, group: str, cpu: float, kind: str = MessageType.TRAIN) -> MessageSeconds:
    return MessageSeconds(node, kind, group, wall=2 * cpu, cpu=cpu)


def test_client_seconds_sum_a_rounds_fit_messages_per_node_and_skip_round_one():
    messages = [seconds(1, "1", 9.0),  # round 1: first-time costs
                seconds(1, "2", 1.0), seconds(1, "2", 2.0),  # two SecAgg+ stages
                seconds(2, "2", 5.0), seconds(2, "2", 7.0, MessageType.EVALUATE)]
    assert client_seconds(messages, skip_first=True) == (4.0, 8.0)  # (3 + 5) / 2
    assert client_seconds(messages, skip_first=False) == pytest.approx((17 / 3, 34 / 3))
    with pytest.raises(ValueError, match="no fit message"):
        client_seconds([seconds(1, "1", 1.0)], skip_first=True)


def history(rounds: list[tuple[int, int, float]]) -> dict:
    """A history.json with one (bytes up, clients, server CPU seconds) per round."""
    return {"rounds": [{"round": 0, "centralized": {}}] + [
        {"round": i, "bytes": {"up": up, "down": 2 * up},
         "fit": {"num_clients": clients, "num_sampled": clients, "num_failures": 0},
         "server_cpu_seconds": {"fit": cpu}} for i, (up, clients, cpu) in enumerate(rounds, 1)]}


def test_a_row_is_per_client_per_round_and_the_server_median_of_later_rounds():
    """Round 1 (HE: a plaintext broadcast; first-time costs) is left out of every figure."""
    row = row_from("1m", "he", history([(900, 3, 9.0), (200, 2, 1.0), (100, 1, 2.0),
                                        (400, 4, 3.0)]),
                   [seconds(1, "2", 1.0)], accuracy=0.5)
    assert (row.up, row.down, row.rounds) == (100.0, 200.0, 4)
    assert row.server_cpu == 2.0  # rounds 2..4
    assert (row.client_cpu, row.accuracy) == (1.0, 0.5)


def test_a_run_with_a_failed_client_gives_no_row_a_rejected_update_counts():
    runs = history([(300, 3, 9.0), (200, 2, 1.0)])
    runs["rounds"][2]["fit"]["num_rejected"] = 2
    assert row_from("1m", "dp", runs, [seconds(1, "2", 1.0)], accuracy=0.1).up == 100.0
    runs["rounds"][2]["fit"].update(num_failures=1, failures=[{"error": "too few"}])
    with pytest.raises(RuntimeError, match="1m secagg\\+: round 2 had failed .*too few"):
        row_from("1m", "secagg+", runs, [seconds(1, "2", 1.0)], accuracy=0.5)


def test_the_table_gives_each_figure_over_plaintext_at_its_size():
    plain = Row("1m", "plain", 3, 100.0, 100.0, 2.0, 3.0, 0.5, 0.4)
    secure = Row("1m", "secagg+", 3, 250.0, 110.0, 3.0, 4.0, 7.0, 0.4)
    other_size = Row("4.8k", "int8", 3, 25.0, 100.0, 1.0, 1.0, 0.1, 0.9)
    lines = markdown([plain, secure, other_size]).splitlines()
    assert lines[2] == "| 1m | plain | 3 | 100 | 100 | 2.000 (3.000) | 0.5000 | 0.4000 |"
    assert lines[3] == ("| 1m | secagg+ | 3 | 250 (2.5x) | 110 (1.1x) | 3.000 (1.5x) (4.000) | "
                        "7.0000 (14x) | 0.4000 |")
    assert lines[4] == "| 4.8k | int8 | 3 | 25 | 100 | 1.000 (1.000) | 0.1000 | 0.9000 |"


@pytest.mark.slow
def test_the_script_measures_plaintext_and_secagg_side_by_side(tmp_path, capsys):
    """Two real simulations at 4.8k weights: SecAgg+ sends more than plaintext, and every
    figure is measured (the server's fit CPU time comes from the round records)."""
    assert scale_costs.main(["--sizes", "4.8k", "--modes", "plain", "secagg+", "--clients",
                             "5", "--rounds", "2", "--json", str(tmp_path / "rows.json"),
                             "--out", str(tmp_path / "runs")]) == 0
    rows = {row["mode"]: Row(**row) for row in json.loads((tmp_path / "rows.json").read_text())}
    plain, secure = rows["plain"], rows["secagg+"]
    assert plain.up > 4 * 4810 and secure.up > 1.5 * plain.up
    assert all(r.client_cpu > 0 and r.server_cpu > 0 and r.rounds == 2 for r in rows.values())
    assert plain.accuracy > 0.5 and abs(secure.accuracy - plain.accuracy) < 0.05
    assert "| 4.8k | secagg+ |" in capsys.readouterr().out
