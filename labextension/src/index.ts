import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { LabIcon } from '@jupyterlab/ui-components';
import { RbeePanel } from './panel';

const BEE_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">
<g class="jp-icon3" fill="#616161">
<path d="M12 6.5c-2.6 0-4.5 2.3-4.5 5.4 0 3.5 2.1 6.6 4.5 8.1 2.4-1.5 4.5-4.6 4.5-8.1 0-3.1-1.9-5.4-4.5-5.4zm-3 5h6v1.6H9zm.4 3h5.2v1.6H9.4z"/>
<path d="M7.2 8.4C5 6.6 2.6 6.7 2.2 8.3c-.4 1.7 2 3.1 5 2.9zM16.8 8.4c2.2-1.8 4.6-1.7 5 0 .4 1.6-2 3-5 2.8z" opacity=".6"/>
<path d="M10.2 6.7 8.6 3.4l.9-.4 1.6 3.3zM13.8 6.7l1.6-3.3.9.4-1.6 3.3z"/>
</g></svg>`;

export const rbeeIcon = new LabIcon({ name: 'rbee-jupyter:bee', svgstr: BEE_SVG });

const COMMAND = 'rbee:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'rbee-jupyter:plugin',
  description: 'A left-sidebar panel: devices, models, downloads, workers and a playground, live.',
  autoStart: true,
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (app: JupyterFrontEnd, palette: ICommandPalette | null, restorer: ILayoutRestorer | null) => {
    const panel = new RbeePanel();
    panel.title.icon = rbeeIcon;
    app.shell.add(panel, 'left', { rank: 650 });
    panel.connect();
    restorer?.add(panel, 'rbee-panel');

    app.commands.addCommand(COMMAND, {
      label: 'rbee: Open panel',
      caption: 'Show the rbee sidebar (models, downloads, workers, playground)',
      icon: rbeeIcon,
      execute: () => {
        app.shell.activateById(panel.id);
      }
    });
    palette?.addItem({ command: COMMAND, category: 'rbee' });
  }
};

export default plugin;
