"""MicroDiT (Stretching Each Dollar, arXiv 2407.15811). The network is not in the codebase yet; the
package exists so the design card's layout is stable. Spec: ../shared/specs/sid2_microdit.md Part B."""
