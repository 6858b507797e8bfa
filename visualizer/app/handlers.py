"""Every tab's handlers over one shared set of runs: what layout.build wires, and what tests drive in-process."""
from __future__ import annotations

from .compare import CompareTab
from .endpoints import Endpoints
from .generate import GenerateTab
from .learn import LearnTab
from .playground import Playground
from .runs import AppConfig, Runs


class App:
    def __init__(self, config: AppConfig):
        self.config = config
        self.runs = Runs(config)  # the store, the player files, stop flags, form checks
        self.generate_tab = GenerateTab(self.runs)
        self.compare_tab = CompareTab(self.runs)
        self.playground = Playground(config.output_dir)
        self.learn_tab = LearnTab(self.runs, self.playground)  # the guided tour
        self.endpoints = Endpoints(self.runs, self.generate_tab, self.compare_tab)
