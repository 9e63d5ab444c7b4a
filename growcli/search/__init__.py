"""Architecture search by growth: NASH hill-climbing and an EAS-style controller over exact growth steps.

``search(gm, data, SearchSettings(...), TrainSettings(...))`` grows children of a model by
registered function-preserving transforms, trains each briefly and keeps the best, round after
round (:mod:`growcli.search.loop`). The parts, one idea each:

- :mod:`growcli.search.data`: the training and validation files and the one measurement (loss, accuracy);
- :mod:`growcli.search.moves`: the moves from a model, from each transform's own candidates;
- :mod:`growcli.search.policy`: random choices (NASH) or the REINFORCE controller (EAS);
- :mod:`growcli.search.fit`: one SGDR training cycle per child;
- :mod:`growcli.search.child`: make, check and train one child, in this process or spawned ones;
- :mod:`growcli.search.report` and :mod:`growcli.search.outputs`: plan, leaderboard, plot, files.
"""

from growcli.search.data import SearchData, Score, data_from_tensors, evaluate, load_search_data
from growcli.search.fit import TrainSettings
from growcli.search.loop import Round, SearchResult, SearchSettings, search
from growcli.search.moves import Move, enumerate_moves
from growcli.search.outputs import (SearchOutputs, check_search_outputs, load_policy_state, run_log, save_policy_state,
                                    search_plan, write_search_outputs)
from growcli.search.policy import Controller, RandomPolicy, reward
from growcli.search.report import leaderboard, plan_text, plot_png, table_text

__all__ = ["Controller", "Move", "RandomPolicy", "Round", "Score", "SearchData", "SearchOutputs", "SearchResult",
           "SearchSettings", "TrainSettings", "check_search_outputs", "data_from_tensors", "enumerate_moves", "evaluate",
           "leaderboard", "load_policy_state", "load_search_data", "plan_text", "plot_png", "reward", "run_log",
           "save_policy_state", "search", "search_plan", "table_text", "write_search_outputs"]
