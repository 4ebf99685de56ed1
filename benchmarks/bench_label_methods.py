"""SAE-latent labelling per method x criterion on built ConceptWorlds (issue 25): see
`engine.world.eval.label_methods`, where the measuring code lives (`atlas eval labelling` runs the same).

    PYTHONPATH=$PWD python benchmarks/bench_label_methods.py --world <world folder> [--world ...] --calibrate --json out.json
"""

from engine.world.eval.label_methods import main

if __name__ == "__main__":
    main()
