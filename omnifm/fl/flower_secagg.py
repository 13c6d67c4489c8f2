"""Secure aggregation on Flower (SecAgg+, `secagg=true` in the run config).

The server learns only the sample-weighted mean of the participants' weight changes,
never one hospital's: each node masks its change with pairwise masks agreed with the
others (Flower's `SecAggPlusWorkflow` on the server, `secaggplus_mod` on the node) and
the masks cancel in the sum. A round survives nodes that drop out after the key
exchange, as long as `reconstruction_threshold` of them remain.

What it covers, and what not:
- Only strategies whose whole upload is the shared weights and whose server step needs
  only their weighted mean: SECAGG_STRATEGIES (FedAvg, FedProx and the server
  optimizers FedAvgM, FedAdam, FedYogi). The knowledge bank's prototypes and retrieval
  counts (OmniFM), control variates (SCAFFOLD) and FedDyn's per-client sums are not
  means of weights; those strategies refuse secagg.
- The server cannot check one client's update any more: the per-client validation and
  the norm-outlier rejection see only the aggregate (a malicious client can still
  poison it within the clipping range). Combine with `dp-clip`/`dp-noise` to bound
  what one client contributes.
- Each node's change is clipped by SecAgg+ to [-secagg-clip, secagg-clip] and quantised
  to 2^22 levels over that range; a node whose change leaves the range fails its round
  (it would otherwise be silently clipped) and the others are aggregated.
- Evaluation metrics and the number of training samples stay in the clear, as on the
  plain path.
"""
import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from .client import Update

SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
AGGREGATE = -1  # the client id of the one Update that stands for a secure round's participants


def check_secagg(cfg, clip):
    """ValueError naming the setting, for a run that cannot use secure aggregation."""
    if cfg.strategy not in SECAGG_STRATEGIES:
        raise ValueError(f"secagg: strategy {cfg.strategy!r} uploads more than a mean of weights "
                         f"(bank prototypes, control variates or per-client sums); use one of {SECAGG_STRATEGIES}")
    if round(cfg.participation * cfg.clients) < 3:
        raise ValueError("secagg: SecAgg+ needs at least 3 participants per round "
                         f"(participation x clients = {cfg.participation * cfg.clients:g})")
    if not clip > 0:
        raise ValueError(f"secagg-clip: expected a positive clipping range, got {clip}")


class _OneSecureRound(LegacyStrategy):
    """The legacy Strategy that Flower's SecAggPlusWorkflow drives for one round: it
    hands every participant the global weights and keeps the unmasked weighted mean."""

    def __init__(self, server, r, participants):
        self.server, self.r, self.participants = server, r, participants
        self.keys = list(server.global_state)
        self.mean, self.n_samples, self.contributors = None, 0, 0

    def configure_fit(self, server_round, parameters, client_manager):
        weights = ndarrays_to_parameters([self.server.global_state[k].numpy() for k in self.keys])
        fitins = FitIns(weights, {"round": self.r})
        run_id = self.server.grid.run.run_id
        return [(GridClientProxy(self.server.nodes[c], self.server.grid, run_id), fitins) for c in self.participants]

    def aggregate_fit(self, server_round, results, failures):
        for failure in failures:
            self.server.log(f"round {self.r}: secure aggregation lost a node ({failure})")
        if results:  # every result carries the same unmasked mean (the workflow's compatibility layer)
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.n_samples = sum(res.num_examples for _, res in results)
            self.contributors = len(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_client_updates(server, r, participants, clip, flwr_context):
    """{AGGREGATE: one Update holding the participants' weighted mean}, or {} when the
    protocol could not finish (fewer than its threshold of nodes, say): the round then
    has no usable update and is not aggregated."""
    round_ = _OneSecureRound(server, r, participants)
    context = LegacyContext(flwr_context, ServerConfig(num_rounds=r + 1), round_, SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: r})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), keep_input=True)
    n_max = max(server.clients[c].n_train for c in participants)  # SecAgg+ weights by n / max_weight
    workflow = SecAggPlusWorkflow(num_shares=len(participants), reconstruction_threshold=max(2, (len(participants) + 1) // 2),
                                  max_weight=float(n_max), clipping_range=clip, timeout=server.timeout)
    workflow(server.grid, context)
    if round_.mean is None:
        server.log(f"round {r}: secure aggregation did not complete")
        return {}
    *deltas, loss = round_.mean
    weights = {k: (server.global_state[k].double() + torch.from_numpy(np.asarray(d))).to(server.global_state[k].dtype)
               for k, d in zip(round_.keys, deltas)}
    return {AGGREGATE: Update(AGGREGATE, round_.n_samples, weights, float(np.asarray(loss).reshape(-1)[0]),
                              contributors=round_.contributors)}


# -- node ---------------------------------------------------------------------
def secagg_if_requested(message, context, call_next):
    """ClientApp mod: SecAgg+ for the training messages of a secure round (they carry its
    configs), the plain path for every other message."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_secure_round(message):
    return "fitins.parameters" in message.content.array_records


def secure_train(message, train, clip):
    """Train on a secure round's FitIns; reply with this node's weight change (and its
    loss as one more entry: both come out of SecAgg+ as sample-weighted means), which
    secaggplus_mod masks before it leaves the node. train(round, global arrays) ->
    (sim, client, update), the node's usual training."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    sim, client, update = train(int(fitins.config["round"]), parameters_to_ndarrays(fitins.parameters))
    sent = {k: (update.weights[k].double() - v.double()).numpy() for k, v in sim.global_state.items()}
    sent["loss"] = np.array([update.loss], dtype=np.float64)
    for k, d in sent.items():
        if d.size and not np.abs(d).max() <= clip:  # SecAgg+ would clip it silently (NaN fails too)
            raise ValueError(f"secagg-clip: this node's {k} (change) reaches {np.abs(d).max():.3g}, outside the "
                             f"clipping range {clip:g}; raise secagg-clip")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(sent.values())), client.n_train, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
