"""Run the app in-process on Flower's simulation engine (see `fl_app.cli.simulate`).

    python run_simulation.py [--num-supernodes 10] [--run-config "k=v k2=v2"] [--out DIR]
    python run_simulation.py --resume DIR [--run-config "num-server-rounds=40"]
"""

import sys

from fl_app.cli.simulate import main

if __name__ == "__main__":
    sys.exit(main())
