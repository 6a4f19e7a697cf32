"""The rule core of the fold pass: per-channel maps (affine, sites), the absorbers (layers, absorb), the rules
(rules, layout) and the loop that drives them over a graph's index (driver, graph_index, constants, context)."""
