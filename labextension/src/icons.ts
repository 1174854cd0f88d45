import { LabIcon } from '@jupyterlab/ui-components';

const gpuSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M2 6h17a1 1 0 0 1 1 1v2h2v2h-2v2h2v2h-2v2a1 1 0 0 1-1 1H8v2H6v-2H4v2H2zm2 2v8h14V8zm4.5 1a3 3 0 1 1 0 6 3 3 0 0 1 0-6zm0 1.6a1.4 1.4 0 1 0 0 2.8 1.4 1.4 0 0 0 0-2.8zM13 9h3v6h-3z"/>
  </g>
</svg>`;

/** The GPU picker's icon (sidebar tab, settings, launcher-less commands). */
export const gpuIcon = new LabIcon({ name: 'jupyter-io:gpu', svgstr: gpuSvg });
