"""The reference way to assemble a pass's keys: concatenate the key frames on every pass.

The engine keeps a chunk's key frames in one workspace (memflow_nb.engine.context.Workspace);
this oracle builds the same key sequence from the cache, the pass's own keys and zeros each
time, with nothing kept between passes. Both must give the same bits.
"""
import torch

from memflow_nb.engine.context import Workspace, attend_keys


class ConcatWorkspace(Workspace):
    def attend(self, layer, q, k, v, backends=None, observers=(), info=None):
        T = self.T
        parts = []
        for kind, val in self.sink + self.bank + self.local:
            if kind == "cur":
                parts.append((k[:, val * T:(val + 1) * T], v[:, val * T:(val + 1) * T]))
            elif kind == "cache":
                parts.append((val[layer, 0], val[layer, 1]))
            else:
                parts.append((k.new_zeros(k.shape[0], T, *k.shape[2:]),) * 2)
        keys = torch.cat([p[0] for p in parts], dim=1)
        values = torch.cat([p[1] for p in parts], dim=1)
        return attend_keys(self, layer, q, keys, values, backends, observers, info)
