// A StepPlan's compiled Program (the struct is in plan.h): the C++ side of fastdiff.program.
//
// A plan file written by fastdiff.program.save carries the Program every Python loop runs
// (fastdiff.program.compile: only the latents the rest of the plan needs), checked here by
// re-expansion. Without one, dense_program builds a program that keeps every basis latent: N + 2
// rows (c00·x_T, the N outputs, the current input) — exact, but N + 2 latents of memory.
#pragma once

#include "fastdiff/plan.h"

namespace fastdiff {

// The plan's own program when the file had one, else dense_program(plan).
std::shared_ptr<const Program> program_for(const StepPlan& plan);

// The dense program of a validated plan (origin "dense").
Program dense_program(const StepPlan& plan);

// Throws PlanError (code "program") unless the program is well formed for the plan (sizes,
// row indices, no row read before it is written) and re-expands symbolically to the plan's
// coefficients within 1e-8 of max|coef|.
void check_program(const Program& program, const StepPlan& plan);

}  // namespace fastdiff
