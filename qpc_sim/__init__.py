"""A discrete-event simulator for the broadcast and store-and-forward cores (not shipped).

Everything runs on a virtual clock (a heap of events) with seeded randomness, so a
scenario is a pure function of its seed: the same losses, latencies and flaps for every
protocol compared in one run. The node package never imports this one; the wheel
(`[tool.maturin] python-packages`) and the PyInstaller bundle (`cross/qpc.spec` collects
`qpc_node` only; `cross/excludes.txt` names `qpc_sim`) leave it out.
"""
