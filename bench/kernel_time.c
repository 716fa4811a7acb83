/* kernel_time.c -- time the C kernels directly, one ISA forced, no Python:
 * B1 H8 L=S E=Ev=64 (or E given; non-causal, or causal with a 7th argument 1), best of N runs, for before/after checks of
 * one path (e.g. the portable one) on a noisy machine: build each version to
 * its own binary and run them interleaved.
 *
 *   gcc -O3 -fno-math-errno -fopenmp -Isrc_c bench/kernel_time.c src_c/dispatch.c src_c/merge.c \
 *       src_c/attn_generic.c src_c/attn_avx2.c src_c/attn_avx512.c src_c/attn_neon.c -lm -o kernel_time
 *   ./kernel_time ISA DSIZE THREADS [REPS [L [E [CAUSAL]]]]   ISA: 0 generic, 1 avx2, 2 avx512, 3 neon; DSIZE 4 or 8
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <math.h>
#include <time.h>
#include "selfattn.h"
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(int argc,char**argv){
  int isa=atoi(argv[1]), dsize=atoi(argv[2]), nt=atoi(argv[3]), reps=argc>4?atoi(argv[4]):5;
  int64_t U=8,L=argc>5?atoll(argv[5]):1024,S=L,E=argc>6?atoll(argv[6]):64,Ev=E; int causal=argc>7&&atoi(argv[7]);
  size_t n=U*L*E; void*q=malloc(n*dsize),*k=malloc(n*dsize),*v=malloc(n*dsize),*o=malloc(n*dsize);
  for(size_t i=0;i<n;i++){double x=sin(i*0.37), y=cos(i*0.11), z=sin(i*0.053);
    if(dsize==4){((float*)q)[i]=x;((float*)k)[i]=y;((float*)v)[i]=z;}else{((double*)q)[i]=x;((double*)k)[i]=y;((double*)v)[i]=z;}}
  int64_t off[8],ks[9],un[8]; for(int u=0;u<U;u++){off[u]=u*L*E;ks[u]=u;un[u]=u;} ks[U]=U;
  sa_attn_args a; memset(&a,0,sizeof a);
  a.n_units=U;a.n_kv=U;a.L=L;a.S=S;a.E=E;a.Ev=Ev;
  a.q=q;a.q_off=off;a.q_sl=E;a.q_se=1; a.k=k;a.kv_k_off=off;a.k_ss=E;a.k_se=1;
  a.v=v;a.kv_v_off=off;a.v_ss=Ev;a.v_se=1; a.kv_start=ks;a.kv_units=un;
  a.out=o;a.out_off=off;a.out_sl=Ev;a.out_se=1; a.scale=1.0/sqrt((double)E); a.causal=causal; a.num_threads=nt;
  size_t bytes; if(sa_attn_workspace_size(&a,isa,dsize,&bytes)){printf("isa unsupported\n");return 1;}
  void*ws=aligned_alloc(64,(bytes+63)/64*64);
  double best=1e9; for(int r=0;r<reps;r++){double t=now(); int st=dsize==4?sa_attn_fwd_f32(&a,isa,ws,bytes):sa_attn_fwd_f64(&a,isa,ws,bytes); t=now()-t; if(st){printf("err %d\n",st);return 1;} if(t<best)best=t;}
  double chk=0; for(size_t i=0;i<n;i+=97) chk+= dsize==4?((float*)o)[i]:((double*)o)[i];
  printf("%s fp%d nt%d L%ld E%ld%s: %.2f ms (chk %.6f)\n",sa_isa_name(isa),dsize*8,nt,(long)L,(long)E,causal?" causal":"",best*1e3,chk);
  return 0;}
