#include <omp.h>
volatile int sink;
void par(int n, int reps) { for (int r = 0; r < reps; r++) {
  #pragma omp parallel num_threads(n)
  { sink = omp_get_thread_num(); } } }
