"""Continual learning by growth: Compacting, Picking and Growing (Hung et al. 2019).

``learn_tasks(model, tasks, CPGConfig(...))`` learns tasks one after the other in one network
whose hidden layers every task shares: each task prunes its own weights to release capacity
(compact), picks earlier tasks' frozen weights with a learned binary mask (pick), and widens the
layers with growcli's exact widen when its accuracy goal is not met (grow). ``model(x, task=k)``
computes task ``k``; every earlier task's outputs are checked bit-identical after every new task.
``save_cpg``/``load_cpg`` write and read the network as one verified safetensors file; the
command is ``growcli cpg`` (docs/continual.md).
"""

from growcli.cl.driver import CPGConfig, TaskReport, learn_tasks, to_cpg
from growcli.cl.net import CPGNet
from growcli.cl.phases import TaskData
from growcli.cl.store import load_cpg, load_task_dir, save_cpg

__all__ = ["CPGConfig", "CPGNet", "TaskData", "TaskReport", "learn_tasks", "load_cpg", "load_task_dir", "save_cpg", "to_cpg"]
